#!/usr/bin/env python3
"""Keep the code on the web page and in the README identical to the example
files that `cargo test` compiles.

Each place that shows an example is marked with the file it comes from:

  README.md:        <!-- snippet: crates/genius/examples/quick_start.rs -->
                    ```rust,no_run ... ```
  site/index.html:  <!-- snippet: crates/genius/examples/quick_start.rs -->
                    <pre>...</pre><!-- /snippet -->

`snippets.py --write` regenerates them; `snippets.py --check` (run by CI)
fails if any has drifted. The leading `//!` doc comment of an example is
left out of what is shown, and so is a leading `#![allow(...)]`. The page's copy is syntax-highlighted here, so
the page needs no script.
"""
import html
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

KEYWORDS = {
    "as", "async", "await", "break", "const", "continue", "crate", "else", "enum", "fn", "for",
    "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub", "ref", "return",
    "self", "Self", "static", "struct", "super", "trait", "type", "use", "where", "while",
}
TOKEN = re.compile(
    r"(?P<comment>//[^\n]*)"
    r"|(?P<string>\"(?:\\.|[^\"\\])*\")"
    r"|(?P<attr>#\[[^\]]*\])"
    r"|(?P<macro>[a-z_][a-z0-9_]*!)"
    r"|(?P<word>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<number>\b\d[\d_]*\b)"
    r"|(?P<other>.)",
    re.S,
)


def source(path):
    """The example's code without its leading //! doc comment and the lint
    `allow` that lets an example print."""
    lines = (ROOT / path).read_text().splitlines()
    while lines and (
        lines[0].startswith("//!") or lines[0].startswith("#![allow(") or not lines[0].strip()
    ):
        lines.pop(0)
    return "\n".join(lines) + "\n"


def highlight(code):
    out = []
    for m in TOKEN.finditer(code):
        kind, text = m.lastgroup, m.group()
        escaped = html.escape(text, quote=False)
        if kind == "word":
            if text in KEYWORDS:
                out.append(f'<span class="kw">{escaped}</span>')
            elif text[0].isupper():
                out.append(f'<span class="ty">{escaped}</span>')
            else:
                out.append(escaped)
        elif kind in ("comment", "string", "attr", "macro", "number"):
            cls = {"comment": "cm", "string": "st", "attr": "at", "macro": "mc", "number": "nu"}[kind]
            out.append(f'<span class="{cls}">{escaped}</span>')
        else:
            out.append(escaped)
    return "".join(out)


def render_readme(text):
    pattern = re.compile(r"(<!-- snippet: (\S+) -->\n```rust,no_run\n)(.*?)(```)", re.S)
    return pattern.sub(lambda m: m.group(1) + source(m.group(2)) + m.group(4), text)


def render_site(text):
    pattern = re.compile(r"(<!-- snippet: (\S+) -->)(.*?)(<!-- /snippet -->)", re.S)

    def block(m):
        code = highlight(source(m.group(2)))
        return f'{m.group(1)}<pre><code class="rust">{code}</code></pre>{m.group(4)}'

    return pattern.sub(block, text)


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "--check"
    drifted = []
    for name, render in (("README.md", render_readme), ("site/index.html", render_site)):
        path = ROOT / name
        text = path.read_text()
        if "<!-- snippet: " not in text:
            drifted.append(f"{name} shows no snippet")
            continue
        fresh = render(text)
        if fresh != text:
            if mode == "--write":
                path.write_text(fresh)
                print(f"updated {name}")
            else:
                drifted.append(name)
    if drifted:
        print("snippets differ from the example files in: " + ", ".join(drifted), file=sys.stderr)
        print("run `python3 site/snippets.py --write` and commit", file=sys.stderr)
        sys.exit(1)
    print("snippets match the compiled examples")


if __name__ == "__main__":
    main()
