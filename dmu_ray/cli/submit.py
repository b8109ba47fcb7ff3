"""``dmu-ray submit``: a job on a Ray cluster through the job API."""

from __future__ import annotations

import argparse


def _cmd_submit(ns: argparse.Namespace) -> int:
    from ray.job_submission import JobSubmissionClient

    from dmu_ray.submit import follow_job, submit

    if ns.stop or ns.logs:
        client = JobSubmissionClient(ns.address)
        sid = ns.stop or ns.logs
        if ns.stop:
            print(f"{sid}: stop requested" if client.stop_job(sid) else f"{sid}: not running")
            return 0
        status = follow_job(client, sid)
        print(f"{sid}: {status}")
        return 0 if status.endswith("SUCCEEDED") else 1
    if not ns.job:
        raise ValueError("name a job (train, refresh, evaluate, lifecycle), or use --stop/--logs ID")
    sid, status = submit(
        ns.job,
        ns.config,
        ns.address,
        working_dir=ns.working_dir,
        pip=ns.pip,
        submission_id=ns.submission_id,
        follow=not ns.no_follow,
    )
    print(f"{sid}: {status or 'submitted'}")
    return 0 if status is None or status.endswith("SUCCEEDED") else 1


def add_parser(sub) -> None:
    """Add this group's commands to the ``dmu-ray`` sub-parsers ``sub``."""
    from dmu_ray.submit import JOBS

    smt = sub.add_parser(
        "submit",
        help="submit a job to a Ray cluster (job API), follow its logs, or stop it",
        description="Validate the config here, submit `python jobs/<job>.py --config <config>` with this "
        "folder as the working dir, and stream the logs until the job ends (exit 0 when it succeeded).",
    )
    smt.add_argument("job", nargs="?", choices=list(JOBS))
    smt.add_argument("--config", help="job config, inside the working dir")
    smt.add_argument("--address", required=True, help="the cluster's job API, e.g. http://127.0.0.1:8265")
    smt.add_argument("--working-dir", default=".", help="uploaded as the job's working dir (default .)")
    smt.add_argument("--pip", nargs="*", help="extra pip packages for the job's runtime env")
    smt.add_argument("--submission-id", help="a job id of your choosing")
    smt.add_argument("--no-follow", action="store_true", help="return after submitting")
    smt.add_argument("--stop", metavar="ID", help="stop a submitted job")
    smt.add_argument("--logs", metavar="ID", help="follow a submitted job's logs to its end")
    smt.set_defaults(func=_cmd_submit)
