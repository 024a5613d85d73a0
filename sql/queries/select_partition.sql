-- Every registered video of a partition with its basic info, in a stable order.
SELECT path, num_frames, fps, height, width, filter_status, filter_reason
FROM video_meta
WHERE partition_key = %(partition_key)s
ORDER BY path;
