-- Write one caption back (run for every row of a shard inside one transaction). A row is updated only if
-- the video still belongs to the shard that produced the caption (meta_uri NULL: the caller doesn't know
-- the shard) and only if something changed, so writing the same captions again touches no row.
INSERT INTO video_meta (partition_key, path, text, caption_status, caption_error, caption_model, captioned_at)
VALUES (%(partition_key)s, %(path)s, %(text)s, %(caption_status)s, %(caption_error)s, %(caption_model)s, now())
ON CONFLICT (partition_key, path) DO UPDATE
SET text = EXCLUDED.text, caption_status = EXCLUDED.caption_status, caption_error = EXCLUDED.caption_error,
    caption_model = EXCLUDED.caption_model,
    captioned_at = CASE
        WHEN video_meta.text IS NOT DISTINCT FROM EXCLUDED.text
         AND video_meta.caption_status IS NOT DISTINCT FROM EXCLUDED.caption_status
        THEN video_meta.captioned_at ELSE EXCLUDED.captioned_at END
WHERE (%(meta_uri)s::text IS NULL OR video_meta.meta_uri = %(meta_uri)s::text)
  AND (video_meta.text, video_meta.caption_status, video_meta.caption_error, video_meta.caption_model)
      IS DISTINCT FROM (EXCLUDED.text, EXCLUDED.caption_status, EXCLUDED.caption_error, EXCLUDED.caption_model);
