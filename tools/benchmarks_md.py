"""Write one generated section of docs/benchmarks.md, leaving the others as they are."""
import os


def replace_section(path: str, title: str, body: str) -> None:
    """Replace (or append) the block between the markers of section ``title`` with ``body``."""
    begin, end = f"<!-- BEGIN {title} -->", f"<!-- END {title} -->"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## {title}\n\n{block}\n"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
