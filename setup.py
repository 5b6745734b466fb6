"""Lists the packages: cafe_torchrec as is, and planner/ under its install name cafe_planner."""

from setuptools import find_packages, setup

library = find_packages(include=["cafe_torchrec", "cafe_torchrec.*"])
planner = ["cafe_planner" + name[len("planner"):] for name in find_packages(include=["planner", "planner.*"])]
setup(packages=library + planner)
