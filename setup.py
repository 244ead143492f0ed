"""Package discovery (the rest of the metadata is in pyproject.toml): every package under
``ngexp/``, and the config tree ``conf/`` shipped inside the package as ``ngexp.conf`` (only
YAML files; a folder is a namespace package)."""

from setuptools import find_namespace_packages, find_packages, setup

CONF = ["ngexp.conf", *(f"ngexp.conf.{name}" for name in find_namespace_packages(where="conf"))]

setup(packages=find_packages(include=["ngexp", "ngexp.*"]) + CONF,
      package_dir={"ngexp": "ngexp", "ngexp.conf": "conf"})
