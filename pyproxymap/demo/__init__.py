"""The embedded demo: a throwaway Postfix-style config dir with a few real tables."""

from __future__ import annotations

import tempfile
from importlib.resources import files
from pathlib import Path

TABLE_FILES = ("virtual", "access")


def create(root: Path | None = None) -> Path:
    """Write the demo config dir (main.cf, tables, queue dir) and return its path."""
    root = Path(root or tempfile.mkdtemp(prefix="pyproxymap-demo-"))
    (root / "q" / "private").mkdir(parents=True, exist_ok=True)
    (root / "q" / "private").chmod(0o700)
    source = files(__package__)
    for name in TABLE_FILES:
        (root / name).write_text(source.joinpath(name).read_text())
    template = source.joinpath("main.cf").read_text()
    (root / "main.cf").write_text(template.replace("@DEMO@", str(root)))
    return root


def instructions(root: Path) -> str:
    return f"""\
pyproxymap demo: config dir {root}
Tables approved in {root}/main.cf (proxy_read_maps):
  texthash:{root}/virtual
  inline:{{postmaster=root, abuse=security-team}}
  static:demo-static-answer
Try, in another shell:
  pyproxymap query -c {root} texthash:{root}/virtual alice@example.com
  pyproxymap query -c {root} 'inline:{{postmaster=root, abuse=security-team}}' abuse
  pyproxymap check -c {root} texthash:{root}/virtual texthash:{root}/access
With Postfix installed, its own client works unchanged:
  postmap -c {root} -q alice@example.com proxy:texthash:{root}/virtual
Stop with Ctrl-C."""
