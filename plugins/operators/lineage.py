"""OpenLineage for the caption task: its input partition (meta CSV) and output caption CSV as datasets.

A mixin of the operator (``class AscendCaptionOperator(CaptionLineageMixin, BaseOperator)``), so the OpenLineage
provider's listener finds ``get_openlineage_facets_on_complete`` on the task. Dataset names
follow OpenLineage's S3 naming: namespace ``s3://<bucket>``, name ``<key>``. The output dataset carries the
row count of the published CSV (``outputStatistics``) when the try returned one.

Only the provider's own classes are used, imported when the listener asks (not at DAG parse); with no
OpenLineage transport configured the provider disables itself and this code never runs.
"""

from __future__ import annotations


def _s3_dataset(uri: str, rows: int | None = None):
    """An input dataset, or with ``rows`` an output dataset carrying its row count."""
    from airflow.providers.common.compat.openlineage.facet import (
        Dataset,
        OutputDataset,
        OutputStatisticsOutputDatasetFacet,
    )

    bucket, _, key = uri[len("s3://"):].partition("/")
    if rows is None:
        return Dataset(namespace=f"s3://{bucket}", name=key)
    return OutputDataset(namespace=f"s3://{bucket}", name=key,
                         outputFacets={"outputStatistics": OutputStatisticsOutputDatasetFacet(rowCount=rows)})


class CaptionLineageMixin:
    """Reports ``meta_path`` as the input and ``output_uri`` as the output dataset of every caption try."""

    meta_path: str
    output_uri: str | None
    #: the try's XCom result (output URI, row counts); the operator sets it at the end of ``execute``
    lineage_result: dict | None = None

    def get_openlineage_facets_on_start(self):
        return self._lineage(None)

    def get_openlineage_facets_on_complete(self, task_instance):
        return self._lineage(self.lineage_result)

    def get_openlineage_facets_on_failure(self, task_instance):
        return self._lineage(None)

    def _lineage(self, result: dict | None):
        from airflow.providers.openlineage.extractors import OperatorLineage

        inputs = [_s3_dataset(self.meta_path)] if str(self.meta_path or "").startswith("s3://") else []
        outputs = []
        output = (result or {}).get("output") or self.output_uri
        if output and str(output).startswith("s3://"):
            rows = (result or {}).get("rows")
            outputs.append(_s3_dataset(str(output), rows if isinstance(rows, int) else None))
        return OperatorLineage(inputs=inputs, outputs=outputs)
