"""Rebuild offline.html, the HTML template of `dvc plots show` (.dvc/config: plots.html_template), from
offline.html.in with vega, vega-lite and vega-embed inlined, so the page draws its charts without a
network (DVC's own page loads them from a CDN).

    python .dvc/plots/vendor.py              # npm pack the pinned versions into a temporary folder
    python .dvc/plots/vendor.py --from DIR   # or use tarballs already packed there

Each tarball is checked against the npm registry's sha512 integrity pinned below before its minified
UMD build is read; the `//# sourceMappingURL` comment is dropped (the maps are not shipped, and a
browser with developer tools open would request them). Licences of what is inlined: NOTICE.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import subprocess
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name -> (version, dist.integrity from `npm view NAME@VERSION dist.integrity`, file in the package)
PACKAGES = {
    "vega": ("5.33.1", "sha512-1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw==",
             "package/build/vega.min.js"),
    "vega-lite": ("5.23.0", "sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA==",
                  "package/build/vega-lite.min.js"),
    "vega-embed": ("6.29.0", "sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q==",
                   "package/build/vega-embed.min.js"),
}
# Strings that must not occur in inlined code: they would end the <script> early, or DVC would
# substitute its placeholders inside the library.
FORBIDDEN = ("</script", "<!--", "{plot_divs}", "{scripts}", "{refresh_tag}")


def _integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def library(tarball: Path, name: str) -> str:
    version, integrity, member = PACKAGES[name]
    if _integrity(tarball) != integrity:
        raise SystemExit(f"{tarball}: sha512 differs from the pinned {name}@{version}; refusing to inline it")
    with tarfile.open(tarball) as tar:
        code = tar.extractfile(member).read().decode("utf-8")
    code = "\n".join(line for line in code.splitlines() if not line.startswith("//# sourceMappingURL="))
    bad = [s for s in FORBIDDEN if s in code]
    if bad:
        raise SystemExit(f"{name}@{version} contains {bad}: it cannot be inlined as is")
    return f"/* {name} {version} (BSD-3-Clause; see NOTICE) */\n{code}"


def build(pack_dir: Path) -> Path:
    page = (HERE / "offline.html.in").read_text(encoding="utf-8")
    for name, (version, _, _) in PACKAGES.items():
        page = page.replace("{{" + name + "}}", library(pack_dir / f"{name}-{version}.tgz", name))
    out = HERE / "offline.html"
    out.write_text(page, encoding="utf-8")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="pack_dir", type=Path, help="folder holding NAME-VERSION.tgz (default: npm pack them)")
    args = parser.parse_args()
    if args.pack_dir:
        print(f"wrote {build(args.pack_dir)}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        specs = [f"{name}@{version}" for name, (version, _, _) in PACKAGES.items()]
        subprocess.run(["npm", "pack", "--silent", *specs], cwd=tmp, check=True, capture_output=True)
        print(f"wrote {build(Path(tmp))}")


if __name__ == "__main__":
    main()
