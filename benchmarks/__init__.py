"""Benchmarks of pyroflows against its peers; they print tables and never assert times."""


def emit(lines: list[str], out: str | None) -> None:
    """Print a benchmark's Markdown ``lines`` and, given ``out``, write them there too."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
