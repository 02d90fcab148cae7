"""Files from a package's source distribution, fetched once with pip into a cache folder (``.cache/sdists`` at the
repository root, or ``$JAXNORM_SDIST_CACHE``): Flax's own tests (``tests/flax_suite.py``), and the single layer
files of the batch-renormalization implementations the RL projects use (``tests/test_batch_renorm_references.py``),
whose packages pull in dependencies the layers do not need."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE = pathlib.Path(os.environ.get("JAXNORM_SDIST_CACHE", ROOT / ".cache" / "sdists"))


class Unavailable(RuntimeError):
    """The sdist could not be fetched (no network, no such release)."""


def fetch(package: str, version: str, files: list[str], cache: pathlib.Path = CACHE) -> pathlib.Path:
    """A folder holding ``files`` (paths inside the sdist's top folder) of ``package==version``'s sdist."""
    folder = cache / f"{package}-{version}"
    if all((folder / f).is_file() for f in files):
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"{package}=={version}", "-d", tmp, "-q"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired as err:
            raise Unavailable(f"pip download of {package}=={version}'s sdist timed out") from err
        archives = list(pathlib.Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise Unavailable(f"pip could not download {package}=={version}'s sdist: "
                              f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        with tarfile.open(archives[0]) as tar:
            top = tar.getnames()[0].split("/")[0]
            for f in files:
                member = tar.extractfile(tar.getmember(f"{top}/{f}"))
                assert member is not None, f
                target = folder / f
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(member.read())
    return folder
