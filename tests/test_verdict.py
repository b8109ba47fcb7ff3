"""The demo's verdict (issue 17): sentences whose numbers are the evaluation's, in the JSON."""

import pytest

from dmu_ray.evaluate.verdict import verdict, verdict_markdown


def _r(**pairings):
    return {"pairings": {k.replace("_", "/"): {"mAP@100": v} for k, v in pairings.items()}, "headline": {}}


def test_verdict_sentences_quote_the_results():
    results = {
        "independent": _r(new_new=0.80),
        "bct": _r(old_old=0.40, new_old=0.38, new_new=0.78),
        "dmu": _r(old_old=0.40, new_old=0.41, new_upgraded=0.55, new_new=0.81),
    }
    lines = verdict(results)
    texts = [v["text"] for v in lines]
    assert any(
        "dmu's upgrade module lifts the old gallery from 40.00 (old/old) to 55.00" in t and "+15.00" in t
        for t in texts
    )
    assert any("bct's new model queries the untouched old gallery at 38.00" in t for t in texts)
    assert any(t.startswith("Compatibility costs bct 2.00 mAP@100 on new/new") for t in texts)
    assert any(
        t.startswith("Compatibility costs dmu nothing mAP@100 on new/new") and "+1.00" in t for t in texts
    )
    assert any("DMU scores 41.00 and BCT 38.00 mAP@100: DMU is ahead of BCT by 3.00" in t for t in texts)
    gain = next(v for v in lines if "lifts" in v["text"])["figures"]
    assert gain == {"old_old": 40.0, "new_upgraded": 55.0, "gain": pytest.approx(15.0)}
    md = verdict_markdown(results, lines)
    assert "## dmu" in md and "## Verdict" in md and "DMU is ahead of BCT by 3.00" in md
    # without an independent model or one of BCT/DMU, those sentences are not made up
    only = verdict({"dmu": results["dmu"]})
    assert len(only) == 1 and "lifts" in only[0]["text"]
