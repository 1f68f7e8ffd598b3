"""pyproject.toml as the build backend reads it: `pip install -e .` prints no deprecation warning."""
from __future__ import annotations

import re
import warnings

import pytest

from ship_support import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

PYPROJECT = REPO / "pyproject.toml"


def test_license_is_an_spdx_expression_for_a_setuptools_that_knows_them():
    project = tomllib.loads(PYPROJECT.read_text())
    assert project["project"]["license"] == "MIT"  # setuptools >= 77: a string, not the deprecated table
    requires = project["build-system"]["requires"]
    setuptools_pin = next(r for r in requires if r.startswith("setuptools"))
    minimum = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools_pin)
    assert minimum and int(minimum.group(1)) >= 77, setuptools_pin


def test_setuptools_reads_the_project_table_without_warnings():
    setuptools = pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} predates SPDX license expressions")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the deprecation pip showed during the install was a warning here
        dist = apply_configuration(Distribution(), PYPROJECT)
    assert dist.metadata.license_expression == "MIT"
