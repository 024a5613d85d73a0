"""Gallery pages: pagination, escaping, suspicious-caption flags."""

from __future__ import annotations

import numpy as np

from captioning_core import gallery


def _rows(n: int) -> list[gallery.GalleryRow]:
    return [gallery.GalleryRow(i, f"s3://b/v/{i}.mp4", "ok", f"a red square moves left {i}", "", 6, True)
            for i in range(n)]


def test_pages_hold_at_most_page_size_rows_and_link_each_other():
    pages = gallery.render_pages(_rows(10_000), {"rows": 10_000, "captioned": 10_000, "output": "s3://b/o.csv"}, 200)
    assert len(pages) == 100 and "index.html" in pages and "page-0100.html" in pages
    assert all(page.count("<tr data-row=") == gallery.PAGE_SIZE for page in pages.values())
    assert max(len(p) for p in pages.values()) < 100_000  # each page stays small to open
    assert 'href="page-0002.html"' in pages["index.html"] and 'loading="lazy"' in pages["index.html"]


def test_captions_and_errors_are_escaped():
    rows = [gallery.GalleryRow(0, "<script>x</script>.mp4", "ok", "<img src=x onerror=alert(1)>", "", 3, False),
            gallery.GalleryRow(1, "b.mp4", "failed", "", "bad <b>bytes</b>", 0, False)]
    page = gallery.render_pages(rows, {}, 200)["index.html"]
    assert "<script>x" not in page and "<img src=x" not in page and "&lt;b&gt;bytes" in page


def test_flags():
    assert gallery.caption_flags("", "ok", 0, 200) == ["empty"]
    assert gallery.caption_flags("a cat", "ok", 200, 200) == ["cut off"]
    assert gallery.caption_flags("the dog runs the dog runs the dog runs the dog runs", "ok", 12, 200) == ["repetitive"]
    assert gallery.caption_flags("a red square moves left across a black frame", "ok", 9, 200) == []
    assert gallery.caption_flags("", "failed", 0, 200) == []


def test_thumbnail_strip_is_a_jpeg_of_the_requested_height():
    import io

    from PIL import Image

    frames = np.zeros((8, 90, 160, 3), np.uint8)
    img = Image.open(io.BytesIO(gallery.thumbnail_strip(frames)))
    assert img.format == "JPEG" and img.height == gallery.THUMB_HEIGHT and img.width == 4 * 128 + 3 * 3


def test_paths_wrap_at_slashes_and_a_rate_over_too_short_a_time_is_not_shown():
    """Issue 27: the header's S3 path breaks at '/', never mid-name; a rank that ran for a millisecond (its
    only pending row was a broken file) has no rate, so rows/s and tokens/s are '-', not thousands."""
    from captioning_core import stats

    quick = {"rank": 0, "wall_seconds": 0.001, "rows_per_second": 7085.9, "output_tokens_per_second": 0.0,
             "rows_processed": 1, "busy_seconds": 0.0}
    slow = {**quick, "rank": 1, "wall_seconds": 12.0, "rows_per_second": 0.5, "output_tokens_per_second": 4.25}
    assert stats.merge([quick])["rows_per_second"] is None
    merged = stats.merge([quick, slow])
    assert merged["rows_per_second"] == 0.5 and merged["output_tokens_per_second_per_rank"] == [None, 4.25]
    page = gallery.render_pages(_rows(1), {"output": "s3://bucket/meta/2026-11-21/shard-0/out.csv",
                                           **stats.merge([quick])}, 200)["index.html"]
    assert "s3:/<wbr>/<wbr>bucket/<wbr>meta/<wbr>2026-11-21/<wbr>shard-0/<wbr>out.csv" in page
    assert "<b>-</b>rows/s, all ranks, last try" in page and "<b>-</b>output tokens/s per rank" in page
    assert "7085" not in page and "word-break:break-all" not in page
