"""Print the project's requirements for some extras, one per line, from pyproject.toml alone.

The image builds install the dependencies in a layer of their own, keyed on pyproject.toml only, before the
source is copied in: a code change then rebuilds the small source layer, not the whole environment.

    python3 scripts/requirements.py pyproject.toml serve postgres        # core + those extras
    python3 scripts/requirements.py pyproject.toml --only torch,torchvision train
    python3 scripts/requirements.py pyproject.toml --exclude pyarrow serve postgres
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib


def _name(requirement: str) -> str:
    """The normalised project name a requirement string is about (``Foo_Bar[x]>=1`` -> ``foo-bar``)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(project: dict, extras: list[str], *, core: bool = True) -> list[str]:
    """Core dependencies (unless ``core`` is false) plus those of ``extras``, with the project's own
    self-references (``snap2caption[serve]``) expanded, each requirement once, in order."""
    own = _name(project["name"])
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    out: list[str] = list(project.get("dependencies", [])) if core else []
    seen: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"requirements.py: no extra {extra!r} in pyproject.toml ({', '.join(optional)})")
        seen.add(extra)
        for requirement in optional[extra]:
            if _name(requirement) == own:  # snap2caption[a,b]: those extras too
                todo += re.findall(r"[A-Za-z0-9_-]+", requirement.split("[", 1)[1].split("]", 1)[0])
            elif requirement not in out:
                out.append(requirement)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject")
    parser.add_argument("extras", nargs="*")
    parser.add_argument("--only", default="", help="Comma-separated names to keep.")
    parser.add_argument("--exclude", default="", help="Comma-separated names to leave out.")
    parser.add_argument("--no-core", action="store_true", help="Leave out the core dependencies.")
    args = parser.parse_intermixed_args(argv)
    with open(args.pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    lines = requirements(project, args.extras, core=not args.no_core)
    if args.only:
        keep = {_name(n) for n in args.only.split(",")}
        lines = [line for line in lines if _name(line) in keep]
    if args.exclude:
        drop = {_name(n) for n in args.exclude.split(",")}
        lines = [line for line in lines if _name(line) not in drop]
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
