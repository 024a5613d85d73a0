-- Put a kept video into a (new) meta shard. A video re-queued after a failed caption loses that result here,
-- in the same transaction, so the table never shows it both failed and waiting.
UPDATE video_meta
SET meta_uri = %(meta_uri)s, text = NULL, caption_status = NULL, caption_error = NULL, caption_model = NULL,
    captioned_at = NULL
WHERE partition_key = %(partition_key)s AND path = %(path)s;
