-- Which meta shard a kept video was written to.
UPDATE video_meta SET meta_uri = %(meta_uri)s
WHERE partition_key = %(partition_key)s AND path = %(path)s;
