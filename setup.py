"""Package discovery, which pyproject.toml cannot express on its own.

Every package under mammo_retrieval/ is found (so no subpackage is ever left out of the wheel, as
analysis/ and train/ once were). The top-level migrations/ and configs/ folders -- the schema's and the
defaults' source, kept at the top so that alembic and readers find them -- are shipped inside the package
as mammo_retrieval._migrations and mammo_retrieval._configs, with their subpackages discovered too.
Everything else (metadata, package data) is in pyproject.toml.
"""
from setuptools import find_packages, setup

# top-level folder -> the package it becomes inside mammo_retrieval
MAPPED = {"migrations": "mammo_retrieval._migrations", "configs": "mammo_retrieval._configs"}


def discover() -> tuple[list[str], dict[str, str]]:
    """The packages and the package_dir mapping of the wheel."""
    packages = find_packages(include=["mammo_retrieval", "mammo_retrieval.*"])
    package_dir = {"mammo_retrieval": "mammo_retrieval"}
    for folder, name in MAPPED.items():
        package_dir[name] = folder
        packages += [name] + [f"{name}.{sub}" for sub in find_packages(where=folder)]
    return sorted(packages), package_dir


if __name__ == "__main__":
    packages, package_dir = discover()
    setup(packages=packages, package_dir=package_dir)
