"""What every benchmark writes into docs/benchmarks.md: one generated section (the others left as
they are) and the machine it ran on."""
import os
import platform


def machine() -> str:
    """The machine, in words: the GPU's name, else cores, CPU model and torch version."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), no GPU, torch {torch.__version__}"


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
