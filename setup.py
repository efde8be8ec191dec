"""setuptools entry point; project metadata lives in pyproject.toml."""

from setuptools import setup

setup()
