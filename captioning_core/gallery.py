"""A static caption gallery per partition, stored beside the output in its gallery folder
(``captioning_core.layout``).

The index shows summary counts and the first page; further pages hold ``PAGE_SIZE`` rows each, so a
10,000-row partition opens as fast as a 100-row one. Thumbnails (a strip of sampled frames per video) are
separate JPEG objects (``layout.thumb_name``), written by the ranks as they go and loaded lazily by the browser.
Every link is relative, so the folder works wherever it is served from.
"""

from __future__ import annotations

import html
import io
import re
from dataclasses import dataclass

import numpy as np

from captioning_core import storage
from captioning_core.fingerprint import describe
from captioning_core.layout import PartitionLayout, page_name, thumb_name

PAGE_SIZE = 100
THUMB_HEIGHT = 72
THUMB_FRAMES = 4


def thumbnail_strip(frames: np.ndarray, height: int = THUMB_HEIGHT, count: int = THUMB_FRAMES) -> bytes:
    """A JPEG of up to ``count`` evenly spaced frames side by side, ``height`` pixels tall."""
    from PIL import Image

    picks = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    tiles = []
    for i in picks:
        img = Image.fromarray(frames[i])
        width = max(1, round(img.width * height / img.height))
        tiles.append(np.asarray(img.resize((width, height), Image.BILINEAR)))
    gap = np.full((height, 3, 3), 128, dtype=np.uint8)  # a grey rule between frames
    strip = [part for tile in tiles for part in (tile, gap)][:-1]
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(strip, axis=1)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def caption_flags(text: str, status: str, tokens: int, max_new_tokens: int) -> list[str]:
    """Why a finished caption looks suspicious: empty, cut off at the token cap, or repetitive."""
    if status != "ok":
        return []
    flags = []
    words = re.findall(r"\w+", text.lower())
    if not words:
        flags.append("empty")
    if tokens and tokens >= max_new_tokens:
        flags.append("cut off")
    if len(words) >= 8:
        trigrams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
        if len(set(trigrams)) < 0.6 * len(trigrams) or len(set(words)) < 0.35 * len(words):
            flags.append("repetitive")
    return flags


@dataclass
class GalleryRow:
    row: int
    path: str
    status: str
    text: str
    error: str
    tokens: int
    has_thumb: bool


_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#1b1f24}
h1{font-size:1.3em}.sum{display:flex;gap:1.5em;flex-wrap:wrap;margin:.5em 0 1em}
.sum div{background:#f3f5f7;padding:.4em .8em;border-radius:6px}.sum b{font-size:1.2em;display:block}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #e3e6ea;padding:6px;text-align:left;
vertical-align:top}td.thumb img{height:72px;display:block}.ok{color:#17633a}.failed{color:#a4161a}
.flag{background:#fff1c2;border-radius:4px;padding:0 4px;margin-right:4px;font-size:.85em}
.path{font-family:monospace;font-size:.85em;overflow-wrap:anywhere;max-width:28em}.err{color:#a4161a;font-size:.85em}
nav a{margin-right:.6em}.fp{font-size:.85em;color:#57606a;margin-top:.3em}"""


def _nav(page: int, pages: int) -> str:
    links = [f'<a href="{page_name(p)}"{" aria-current=page" if p == page else ""}>{p + 1}</a>'
             for p in range(pages)]
    return f"<nav>pages: {' '.join(links)}</nav>" if pages > 1 else ""


def _row_html(r: GalleryRow, max_new_tokens: int, fingerprint: str) -> str:
    src = html.escape(thumb_name(r.row, fingerprint))
    thumb = f'<img loading="lazy" src="{src}" alt="frames of row {r.row}">' if r.has_thumb else ""
    flags = "".join(f'<span class="flag">{html.escape(f)}</span>'
                    for f in caption_flags(r.text, r.status, r.tokens, max_new_tokens))
    err = f'<div class="err">{html.escape(r.error)}</div>' if r.error else ""
    return (f'<tr data-row="{r.row}"><td>{r.row}</td><td class="thumb">{thumb}</td>'
            f'<td class="path">{_breakable_path(r.path)}</td><td class="{html.escape(r.status)}">'
            f'{html.escape(r.status)}</td><td class="caption">{flags}{html.escape(r.text)}{err}</td></tr>')


def _figure(value) -> str:
    """A summary figure as shown: "-" where there is none (a rate over too short a time is none)."""
    return "-" if value is None else str(value)


def _breakable_path(path: str) -> str:
    """``path`` escaped, with line-break opportunities after each ``/`` (it wraps there, not mid-name)."""
    return html.escape(path).replace("/", "/<wbr>")


def render_pages(rows: list[GalleryRow], summary: dict, max_new_tokens: int) -> dict[str, str]:
    """File name -> HTML for every page of the gallery."""
    pages = max(1, -(-len(rows) // PAGE_SIZE))
    flagged = sum(bool(caption_flags(r.text, r.status, r.tokens, max_new_tokens)) for r in rows)
    cards = [("rows", summary.get("rows", len(rows))), ("captioned", summary.get("captioned", 0)),
             ("failed", summary.get("failed", 0)), ("skipped (done before)", summary.get("skipped", 0)),
             ("flagged", flagged), ("rows/s, all ranks, last try", _figure(summary.get("rows_per_second"))),
             ("model busy", summary.get("model_busy", "-")),
             ("output tokens/row", summary.get("partition_output_tokens_per_row") or "-"),
             ("output tokens/s per rank, last try", " / ".join(_figure(v) for v in
                                                               summary.get("output_tokens_per_second_per_rank")
                                                               or []) or "-")]
    head = "".join(f"<div><b>{html.escape(str(v))}</b>{html.escape(k)}</div>" for k, v in cards)
    fp = summary.get("fingerprint")
    settings = (f'<div class="fp" data-fingerprint="{html.escape(str(fp.get("id", "")))}">settings '
                f"{html.escape(describe(fp))}</div>" if fp else "")
    out = {}
    for page in range(pages):
        chunk = rows[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
        body = "".join(_row_html(r, max_new_tokens, str((fp or {}).get("id", ""))) for r in chunk)
        out[page_name(page)] = (
            f"<!doctype html><html><head><meta charset=utf-8><title>Captions: "
            f"{html.escape(summary.get('output', ''))}</title><style>{_STYLE}</style></head><body>"
            f"<h1>Caption gallery</h1><div class=path>{_breakable_path(summary.get('output', ''))} "
            f"({html.escape(str(summary.get('model', '')))})</div>{settings}<div class=sum>{head}</div>{_nav(page, pages)}"
            f"<table><thead><tr><th>#</th><th>frames</th><th>video</th><th>status</th><th>caption</th></tr>"
            f"</thead><tbody>{body}</tbody></table>{_nav(page, pages)}</body></html>")
    return out


def write_gallery(output: str, rows: list[GalleryRow], summary: dict, max_new_tokens: int) -> str:
    """Write every page; returns the index URI."""
    layout = PartitionLayout(output)
    storage.write_many({layout.gallery + name: page.encode("utf-8")
                        for name, page in render_pages(rows, summary, max_new_tokens).items()})
    return layout.gallery_index
