"""Build `mixed.jsonl.gz`, the second bundled corpus (issue 17 item 1): ~24M bytes in five domains.

    python train/corpus/build_mixed.py            # rebuild train/corpus/mixed.jsonl.gz and mixed.json
    python train/corpus/build_mixed.py --check    # rebuild in memory and compare with the committed file
    zoo train lm-dense-tiny --data train/corpus/mixed.jsonl.gz

Every line is one JSON document {"text": ..., "domain": ..., "source": ...}; the trainer reads the
"text" field (byte tokenizer: one token per byte). Domains (licences in README.md):

- python:     CPython's standard library sources (*.py outside site-packages), PSF License 2.0
- java:       OpenJDK's java.base sources (java/**.java in the JDK's lib/src.zip), GPL-2.0 with the
              Classpath Exception (a few files carry their own permissive notice, kept in the file)
- prose:      the Jargon File 4.4.7 (the bundled jargon.txt.gz, public domain), cut into ~4 KB pieces
- arithmetic: generated here (seeded): sums, differences, products, quotients with remainders, gcds, powers
- records:    generated here (seeded): CSV and JSON-lines tables whose derived fields are consistent
              (total = quantity x unit price, ISO dates, a checksum column)

The order is deterministic: sources are read in sorted order, files are chosen by the SHA-256 of their
relative path until a domain's byte budget is met, and the documents of all domains are interleaved by a
seeded shuffle, so any contiguous or interleaved split holds every domain. The gzip header has no
timestamp or name, so the same inputs give the same bytes. The inputs differ between machines (another
Python or JDK version); the committed file is the reference and mixed.json records what it was built from.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import math
import random
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "mixed.jsonl.gz"
MANIFEST = HERE / "mixed.json"
SEED = 17
BUDGETS = {"python": 9_500_000, "java": 6_500_000, "prose": 2_000_000, "arithmetic": 3_000_000,
           "records": 3_000_000}  # bytes of text per domain (prose: the whole Jargon File, ~1.7M)
MAX_DOC_BYTES = 200_000  # longer source files are skipped (generated tables, not code a person wrote)
JDK_SOURCES = ("/usr/lib/jvm/temurin-25-jdk-amd64/lib/src.zip", "/usr/lib/jvm/java-17-openjdk-amd64/lib/src.zip")


def _by_hash(names: list[str]) -> list[str]:
    """Names in the order of the SHA-256 of each: a fixed, well-mixed order that does not depend on listing order."""
    return sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())


def _take(docs: Iterator[tuple[str, str]], budget: int) -> list[tuple[str, str]]:
    """(source, text) documents until their UTF-8 bytes reach `budget`."""
    taken, size = [], 0
    for source, text in docs:
        if size >= budget:
            break
        taken.append((source, text))
        size += len(text.encode("utf-8"))
    return taken


def python_docs(stdlib: Path) -> Iterator[tuple[str, str]]:
    """CPython standard library modules (UTF-8, at most MAX_DOC_BYTES), by hash of their relative path."""
    files = [str(p.relative_to(stdlib)) for p in stdlib.rglob("*.py")
             if "site-packages" not in p.parts and p.is_file()]
    for rel in _by_hash(files):
        data = (stdlib / rel).read_bytes()
        if not data.strip() or len(data) > MAX_DOC_BYTES:
            continue
        try:
            yield f"cpython/Lib/{rel}", data.decode("utf-8")
        except UnicodeDecodeError:
            continue


def java_docs(src_zip: Path) -> Iterator[tuple[str, str]]:
    """java.base/java/**.java from the JDK's src.zip, by hash of their path."""
    with zipfile.ZipFile(src_zip) as z:
        names = [n for n in z.namelist() if n.startswith("java.base/java/") and n.endswith(".java")]
        for name in _by_hash(names):
            data = z.read(name)
            if len(data) > MAX_DOC_BYTES:
                continue
            try:
                yield f"openjdk/{name}", data.decode("utf-8")
            except UnicodeDecodeError:
                continue


def prose_docs(jargon: Path, piece: int = 4000) -> Iterator[tuple[str, str]]:
    """The Jargon File cut at paragraph breaks into pieces of about `piece` characters, in order."""
    with gzip.open(jargon, "rt", encoding="utf-8") as f:
        paragraphs = f.read().split("\n\n")
    buf: list[str] = []
    n = 0
    for para in paragraphs:
        buf.append(para)
        if sum(len(p) for p in buf) >= piece:
            yield f"jargon-4.4.7#{n}", "\n\n".join(buf)
            buf, n = [], n + 1
    if buf:
        yield f"jargon-4.4.7#{n}", "\n\n".join(buf)


def arithmetic_docs(seed: int = SEED) -> Iterator[tuple[str, str]]:
    """Worksheets of 64 exact arithmetic facts each (the answers are computed, so they are right)."""
    rng = random.Random(seed)
    n = 0
    while True:
        lines = []
        for _ in range(64):
            op = rng.choice("+-*/gp")
            a, b = rng.randint(0, 10 ** rng.randint(1, 4)), rng.randint(1, 10 ** rng.randint(1, 4))
            if op == "+":
                lines.append(f"{a} + {b} = {a + b}")
            elif op == "-":
                lines.append(f"{a} - {b} = {a - b}")
            elif op == "*":
                lines.append(f"{a} * {b} = {a * b}")
            elif op == "/":
                lines.append(f"{a} / {b} = {a // b} remainder {a % b}")
            elif op == "g":
                lines.append(f"gcd({a}, {b}) = {math.gcd(a, b)}")
            else:
                base, exp = rng.randint(2, 12), rng.randint(2, 6)
                lines.append(f"{base} ^ {exp} = {base ** exp}")
        yield f"generated/arithmetic#{n}", "\n".join(lines) + "\n"
        n += 1


ITEMS = ["bolt", "washer", "gear", "spring", "bearing", "valve", "gasket", "pulley", "sprocket", "hinge",
         "rivet", "clamp", "nozzle", "bushing", "coupler", "flange"]
CITIES = ["Aberdeen", "Bergen", "Cork", "Dresden", "Esbjerg", "Faro", "Gdansk", "Haarlem", "Innsbruck",
          "Jena", "Kaunas", "Lille", "Malmo", "Nantes", "Oulu", "Porto"]


def records_docs(seed: int = SEED + 1) -> Iterator[tuple[str, str]]:
    """Order tables of 40 rows, alternately CSV and JSON lines; total = qty * unit price, check = sum mod 97."""
    rng = random.Random(seed)
    n = 0
    while True:
        rows = []
        for _ in range(40):
            qty, cents = rng.randint(1, 500), rng.randint(5, 99_999)
            date = f"20{rng.randint(10, 29)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
            order = rng.randint(100_000, 999_999)
            total = qty * cents
            rows.append({"order": order, "date": date, "city": rng.choice(CITIES), "item": rng.choice(ITEMS),
                         "qty": qty, "unit_price": f"{cents // 100}.{cents % 100:02d}",
                         "total": f"{total // 100}.{total % 100:02d}", "check": (order + qty + cents) % 97})
        if n % 2 == 0:
            text = "order,date,city,item,qty,unit_price,total,check\n" + "".join(
                ",".join(str(r[c]) for c in rows[0]) + "\n" for r in rows)
        else:
            text = "".join(json.dumps(r) + "\n" for r in rows)
        yield f"generated/records#{n}", text
        n += 1


def build(stdlib: Path, src_zip: Path, jargon: Path) -> tuple[bytes, dict]:
    """The gzip bytes of the corpus and its manifest."""
    sources = {"python": python_docs(stdlib), "java": java_docs(src_zip), "prose": prose_docs(jargon),
               "arithmetic": arithmetic_docs(), "records": records_docs()}
    docs = [(domain, source, text) for domain, it in sources.items() for source, text in _take(it, BUDGETS[domain])]
    random.Random(SEED).shuffle(docs)
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="", compresslevel=9) as f:
        for domain, source, text in docs:
            f.write((json.dumps({"text": text, "domain": domain, "source": source}) + "\n").encode("utf-8"))
    data = raw.getvalue()
    domains = {}
    for domain, _, text in docs:
        d = domains.setdefault(domain, {"documents": 0, "bytes": 0})
        d["documents"] += 1
        d["bytes"] += len(text.encode("utf-8"))
    manifest = {"file": OUT.name, "sha256": hashlib.sha256(data).hexdigest(), "gzip_bytes": len(data),
                "text_bytes": sum(d["bytes"] for d in domains.values()), "documents": len(docs),
                "domains": domains, "seed": SEED,
                "inputs": {"python_stdlib": str(stdlib), "python_version": sys.version.split()[0],
                           "jdk_src_zip": str(src_zip), "jargon": str(jargon.relative_to(HERE.parent.parent))
                           if jargon.is_relative_to(HERE.parent.parent) else str(jargon)}}
    return data, manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"], help="CPython's Lib folder")
    p.add_argument("--jdk-src", default=next((z for z in JDK_SOURCES if Path(z).is_file()), JDK_SOURCES[0]),
                   help="a JDK's lib/src.zip")
    p.add_argument("--out", default=str(OUT), help="output .jsonl.gz (the manifest goes beside it as .json)")
    p.add_argument("--check", action="store_true", help="build in memory and compare with --out; write nothing")
    args = p.parse_args(argv)
    if not Path(args.jdk_src).is_file():
        print(f"no JDK sources at {args.jdk_src}; pass --jdk-src", file=sys.stderr)
        return 2
    data, manifest = build(Path(args.stdlib), Path(args.jdk_src), HERE / "jargon.txt.gz")
    out = Path(args.out)
    if args.check:
        same = out.is_file() and out.read_bytes() == data
        print(f"{out}: {'identical' if same else 'DIFFERS'} (built sha256 {manifest['sha256']})")
        return 0 if same else 1
    out.write_bytes(data)
    out.with_name(out.name.removesuffix(".jsonl.gz") + ".json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
