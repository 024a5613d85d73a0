"""Where every object of a partition lives, relative to its output: the one place that spells those names.

A partition's output (the meta CSV with captions, the commit marker) has objects beside it: the summary, the
gallery (pages and thumbnails), the journal of finished rows with the ranks' stats, and the lease that keeps two
attempts apart. The ranks, the operator and the gallery view in the API server all name them, so they name them
through :class:`PartitionLayout`. Standard library only: the Airflow plugin and operator import it.
"""

from __future__ import annotations

from dataclasses import dataclass

#: the seed's output naming, ``{stem}_caption_{model}{ext}``; an output may also be named by ``--output``
DEFAULT_OUTPUT_MARK = "_caption_"
_GALLERY_FILES = (".html", ".jpg")  # gallery pages and thumbnails: all the gallery view serves


def default_output_name(stem: str, model: str, ext: str) -> str:
    """The seed's naming: ``{stem}_caption_{model}{ext}`` beside the input."""
    return f"{stem}{DEFAULT_OUTPUT_MARK}{model}{ext or '.csv'}"


def page_name(page: int) -> str:
    """A gallery page's file name (page 0 is the index)."""
    return "index.html" if page == 0 else f"page-{page + 1:04d}.html"


def thumb_name(row: int) -> str:
    """A row's thumbnail strip, relative to the gallery folder (the pages link it so)."""
    return f"thumbs/{row:08d}.jpg"


@dataclass(frozen=True)
class PartitionLayout:
    """The objects of the partition whose output is ``output`` (a local path, an ``s3://`` URI or a bare key)."""

    output: str

    @property
    def summary(self) -> str:
        return f"{self.output}.summary.json"

    @property
    def gallery(self) -> str:
        """The gallery folder (``/``-terminated)."""
        return f"{self.output}.gallery/"

    @property
    def gallery_index(self) -> str:
        return self.gallery + page_name(0)

    def gallery_page(self, page: int) -> str:
        return self.gallery + page_name(page)

    def thumb(self, row: int) -> str:
        return self.gallery + thumb_name(row)

    @property
    def parts(self) -> str:
        """The journal's parts: ranks persist finished rows here, beside the output, never in another's."""
        return f"{self.output}.parts/"

    @property
    def stats(self) -> str:
        """The ranks' stats records, one object per rank and attempt (inside the journal folder)."""
        return self.parts + "stats/"

    def stats_object(self, rank: int, stamp_ns: int) -> str:
        return f"{self.stats}rank{rank:03d}-{stamp_ns}.json"

    @property
    def lease(self) -> str:
        """The partition lease (operators.lease)."""
        return f"{self.output}.lease"

    def relative(self, uri: str) -> str:
        """``uri`` (one of this layout's objects) as a suffix of the output, as the operator's links append it."""
        if not uri.startswith(self.output):
            raise ValueError(f"{uri!r} is not beside {self.output!r}")
        return uri[len(self.output):]

    def serves(self, key: str) -> bool:
        """``key`` is what the gallery view may serve of this partition: the output itself, its summary, or a
        gallery page or thumbnail; never the journal or the lease, and never a path with ``..`` in it."""
        if ".." in key.split("/") or key.startswith("/"):
            return False
        if key in (self.output, self.summary):
            return True
        return key.startswith(self.gallery) and key.rsplit("/", 1)[-1].endswith(_GALLERY_FILES)


def looks_like_gallery_object(key: str) -> bool:
    """Without knowing the output: ``key`` has the shape of a default-named output, its summary or a gallery
    file (a first filter; :meth:`PartitionLayout.serves` decides)."""
    if ".." in key.split("/") or key.startswith("/"):
        return False
    name = key.rsplit("/", 1)[-1]
    probe = PartitionLayout("")
    if probe.gallery in key:
        return name.endswith(_GALLERY_FILES)
    return DEFAULT_OUTPUT_MARK in name and name.endswith((".csv", ".csv" + probe.summary))
