-- Every registered video of a partition with its basic info, shard, caption state and identity, in a
-- stable order.
SELECT path, num_frames, fps, height, width, filter_status, filter_reason, meta_uri, caption_status,
       video_etag
FROM video_meta
WHERE partition_key = %(partition_key)s
ORDER BY path;
