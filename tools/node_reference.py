"""The node reference (docs/nodes.md), generated from a live server's /object_info, so the docs
never drift from the code: descriptions and tooltips are the nodes' own.

    python -m tools.node_reference --server http://127.0.0.1:8188 > docs/nodes.md   (or `make docs`)
"""
from __future__ import annotations

import json
import sys

HEADER = ("# Node reference\n\nGenerated from the nodes' own descriptions and tooltips (`make docs`; a test "
          "fails when this file is stale).\n")


from tools.workflow import is_file_value  # noqa: E402


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _input_row(name: str, spec, required: bool) -> str:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if isinstance(kind, list):
        kind, opts = "COMBO", dict(opts, options=kind)
    if kind == "COMBO":
        options = opts.get("options", [])
        if not options or any(is_file_value(o) for o in options):   # a folder listing: depends on the install
            detail = "a file name from the folder the tooltip names"
        else:
            values = ", ".join(str(o) for o in options[:8])
            detail = f"one of {values}" + (f"; default {opts['default']}" if "default" in opts else "")
    elif kind in ("INT", "FLOAT"):
        parts = [f"{k} {opts[k]}" for k in ("default", "min", "max", "step") if k in opts]
        detail = ", ".join(parts)
    elif "default" in opts:
        detail = f"default {opts['default']!r}"
    else:
        detail = ""
    return (f"| `{name}` | {kind} | {'required' if required else 'optional'} | {_cell(detail)} | "
            f"{_cell(opts.get('tooltip', ''))} |")


def render(object_info: dict, prefix: str = "ARCache") -> str:
    out = [HEADER]
    for node_id in sorted(k for k in object_info if k.startswith(prefix)):
        info = object_info[node_id]
        out += [f"## {info.get('display_name') or node_id} (`{node_id}`)", "",
                f"Category `{info.get('category', '')}`. {info.get('description', '')}", "",
                "| input | type | | values | what it does |", "|---|---|---|---|---|"]
        order = info.get("input_order") or {g: list(info["input"].get(g, {})) for g in ("required", "optional")}
        for group in ("required", "optional"):
            for name in order.get(group, []):
                out.append(_input_row(name, info["input"][group][name], group == "required"))
        out += ["", "| output | type | what it is |", "|---|---|---|"]
        names = info.get("output_name") or info.get("output", [])
        tips = info.get("output_tooltips") or [""] * len(names)
        for name, kind, tip in zip(names, info.get("output", []), tips):
            out.append(f"| {name} | {kind} | {_cell(tip or '')} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    import argparse
    import urllib.request
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="http://127.0.0.1:8188")
    a = ap.parse_args(argv)
    with urllib.request.urlopen(a.server + "/object_info", timeout=60) as r:
        sys.stdout.write(render(json.loads(r.read())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
