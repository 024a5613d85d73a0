-- The training manifest of a partition: captioned rows only (failed or empty captions left out).
SELECT path, text, num_frames, fps, height, width
FROM video_meta
WHERE partition_key = %(partition_key)s AND filter_status = 'kept'
  AND caption_status = 'ok' AND coalesce(btrim(text), '') <> ''
ORDER BY path;
