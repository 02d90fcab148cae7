"""Print pip constraints that pin every ">=" floor of the library's dependencies (and the equinox and test extras)
to "==".

CI installs with them, so the versions pyproject admits as oldest are the ones the whole suite runs on. (Tool
extras such as docs and dev are not pinned: they build and check, users do not import them.)
"""

import pathlib
import re
import tomllib

project = tomllib.loads((pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
requirements += project["optional-dependencies"]["equinox"] + project["optional-dependencies"]["test"]
pins = {}
for req in requirements:
    m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)", req.strip())
    if m and not m.group(1).startswith("jaxnorm"):
        pins[m.group(1).lower()] = m.group(2)
print("\n".join(f"{name}=={version}" for name, version in sorted(pins.items())))
