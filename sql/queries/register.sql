-- Register a video found under the partition's S3 prefix; a video seen before is left as it is.
INSERT INTO video_meta (partition_key, path, size_bytes)
VALUES (%(partition_key)s, %(path)s, %(size_bytes)s)
ON CONFLICT (partition_key, path) DO NOTHING;
