"""Write offline.html, the page `dvc plots show` fills (plots.html_template in .dvc/config).

DVC's default page loads Vega, Vega-Lite and Vega-Embed from a CDN, so its plots are blank
offline. This page carries the three minified builds inline: it works wherever `dvc plots show -o`
writes it and when the HTML is copied elsewhere. Only the vendored npm packages are read.

Update the libraries (network needed once):

    cd "$(mktemp -d)" && npm pack vega@5 vega-lite@5 vega-embed@6 && for f in *.tgz; do tar xzf "$f" && mv package "${f%.tgz}"; done
    python /path/to/repo/.dvc/plots/build_template.py "$PWD"

then put the versions and integrity hashes that `npm view <pkg>@<version> dist.integrity` prints in
vendor/README.md.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Order matters: vega-lite needs vega, vega-embed needs both.
PACKAGES = ("vega", "vega-lite", "vega-embed")
# DVC fills these by plain text replacement; a library that contained one would be corrupted.
PLACEHOLDERS = ("{scripts}", "{plot_divs}", "{refresh_tag}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <!-- Vega, Vega-Lite and Vega-Embed inline (BSD-3-Clause, see vendor/ next to this file's source in
         the repository's .dvc/plots/): no network needed. DVC's {scripts} (CDN links) is left out on purpose. -->
@LIBRARIES@
    <script>
        // SVG rather than canvas: crisp when zoomed, and the drawn marks are part of the page
        // (tests/test_dvc_plots.py reads them from the DOM).
        (function () {
            var embed = window.vegaEmbed;
            window.vegaEmbed = function (el, spec, opt) {
                return embed(el, spec, Object.assign({renderer: "svg"}, opt));
            };
        })();
    </script>
    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def build(unpacked: Path) -> str:
    """The page, with each package's ``build/<name>.min.js`` from ``unpacked/<name>-<version>/``."""
    parts = []
    for name in PACKAGES:
        [folder] = [d for d in unpacked.iterdir() if re.fullmatch(rf"{re.escape(name)}-\d+\.\d+\.\d+", d.name)]
        js = (folder / "build" / f"{name}.min.js").read_text(encoding="utf8")
        js = re.sub(r"\n?//# sourceMappingURL=\S+\s*$", "", js)  # the map is not vendored
        bad = [p for p in (*PLACEHOLDERS, "</script") if p in js]
        if bad:
            raise SystemExit(f"{folder.name}: contains {bad}, cannot be inlined")
        version = folder.name[len(name) + 1:]
        digest = hashlib.sha256(js.encode()).hexdigest()
        parts.append(f"    <!-- {name} {version} (npm), build/{name}.min.js, sha256 {digest} -->\n"
                     f"    <script>{js}</script>")
    # The comment above mentions {scripts}; write it so DVC leaves it alone.
    return PAGE.replace("DVC's {scripts}", "DVC's scripts").replace("@LIBRARIES@", "\n".join(parts))


if __name__ == "__main__":
    (HERE / "offline.html").write_text(build(Path(sys.argv[1])), encoding="utf8")
