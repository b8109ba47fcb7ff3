"""The trainee now lives with the methods that build it (:mod:`dmu_ray.methods.trainee`); this
name stays for code that imported it from here."""

from dmu_ray.methods.trainee import Trainee

__all__ = ["Trainee"]
