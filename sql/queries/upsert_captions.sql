-- Write one caption back (run for every row of a shard inside one transaction).
INSERT INTO video_meta (partition_key, path, text, caption_status, caption_error, caption_model, captioned_at)
VALUES (%(partition_key)s, %(path)s, %(text)s, %(caption_status)s, %(caption_error)s, %(caption_model)s, now())
ON CONFLICT (partition_key, path) DO UPDATE
SET text = EXCLUDED.text, caption_status = EXCLUDED.caption_status, caption_error = EXCLUDED.caption_error,
    caption_model = EXCLUDED.caption_model,
    captioned_at = CASE
        WHEN video_meta.text IS NOT DISTINCT FROM EXCLUDED.text
         AND video_meta.caption_status IS NOT DISTINCT FROM EXCLUDED.caption_status
        THEN video_meta.captioned_at ELSE EXCLUDED.captioned_at END;
