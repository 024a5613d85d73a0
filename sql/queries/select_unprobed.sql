-- Videos of a partition that the filter step has not looked at yet.
SELECT path FROM video_meta
WHERE partition_key = %(partition_key)s AND filter_status IS NULL
ORDER BY path;
