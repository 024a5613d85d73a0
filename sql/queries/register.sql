-- Register a video found under the partition's S3 prefix with its identity (ETag, size, LastModified).
-- A video seen before with the same identity is left as it is. One whose ETag or size changed (replaced in
-- place) is a new video at an old path: its probe, verdict, shard and caption are cleared in this statement,
-- so filter probes it again and puts it into a new shard, and its old shard's result is never written back
-- for it (upsert_captions checks the shard). A row registered before ETags were recorded adopts the ETag
-- when its size is unchanged (no recaption of a whole partition on upgrade). Only LastModified changing (the
-- same bytes uploaded again: same ETag) is recorded and re-queues nothing.
INSERT INTO video_meta AS v (partition_key, path, size_bytes, video_etag, video_modified)
VALUES (%(partition_key)s, %(path)s, %(size_bytes)s, %(video_etag)s, %(video_modified)s)
ON CONFLICT (partition_key, path) DO UPDATE
SET size_bytes = EXCLUDED.size_bytes, video_etag = EXCLUDED.video_etag, video_modified = EXCLUDED.video_modified,
    num_frames = CASE WHEN v.size_bytes IS DISTINCT FROM EXCLUDED.size_bytes
                        OR (v.video_etag IS NOT NULL AND v.video_etag IS DISTINCT FROM EXCLUDED.video_etag)
                      THEN NULL ELSE v.num_frames END,
    fps = CASE WHEN v.size_bytes IS DISTINCT FROM EXCLUDED.size_bytes
                 OR (v.video_etag IS NOT NULL AND v.video_etag IS DISTINCT FROM EXCLUDED.video_etag)
               THEN NULL ELSE v.fps END,
    height = CASE WHEN v.size_bytes IS DISTINCT FROM EXCLUDED.size_bytes
                    OR (v.video_etag IS NOT NULL AND v.video_etag IS DISTINCT FROM EXCLUDED.video_etag)
                  THEN NULL ELSE v.height END,
    width = CASE WHEN v.size_bytes IS DISTINCT FROM EXCLUDED.size_bytes
                   OR (v.video_etag IS NOT NULL AND v.video_etag IS DISTINCT FROM EXCLUDED.video_etag)
                 THEN NULL ELSE v.width END,
    filter_status = CASE WHEN v.size_bytes IS DISTINCT FROM EXCLUDED.size_bytes
                           OR (v.video_etag IS NOT NULL AND v.video_etag IS DISTINCT FROM EXCLUDED.video_etag)
                         THEN NULL ELSE v.filter_status END,
    filter_reason = CASE WHEN v.size_bytes IS DISTINCT FROM EXCLUDED.size_bytes
                           OR (v.video_etag IS NOT NULL AND v.video_etag IS DISTINCT FROM EXCLUDED.video_etag)
                         THEN NULL ELSE v.filter_reason END,
    meta_uri = CASE WHEN v.size_bytes IS DISTINCT FROM EXCLUDED.size_bytes
                      OR (v.video_etag IS NOT NULL AND v.video_etag IS DISTINCT FROM EXCLUDED.video_etag)
                    THEN NULL ELSE v.meta_uri END,
    text = CASE WHEN v.size_bytes IS DISTINCT FROM EXCLUDED.size_bytes
                  OR (v.video_etag IS NOT NULL AND v.video_etag IS DISTINCT FROM EXCLUDED.video_etag)
                THEN NULL ELSE v.text END,
    caption_status = CASE WHEN v.size_bytes IS DISTINCT FROM EXCLUDED.size_bytes
                            OR (v.video_etag IS NOT NULL AND v.video_etag IS DISTINCT FROM EXCLUDED.video_etag)
                          THEN NULL ELSE v.caption_status END,
    caption_error = CASE WHEN v.size_bytes IS DISTINCT FROM EXCLUDED.size_bytes
                           OR (v.video_etag IS NOT NULL AND v.video_etag IS DISTINCT FROM EXCLUDED.video_etag)
                         THEN NULL ELSE v.caption_error END,
    caption_model = CASE WHEN v.size_bytes IS DISTINCT FROM EXCLUDED.size_bytes
                           OR (v.video_etag IS NOT NULL AND v.video_etag IS DISTINCT FROM EXCLUDED.video_etag)
                         THEN NULL ELSE v.caption_model END,
    captioned_at = CASE WHEN v.size_bytes IS DISTINCT FROM EXCLUDED.size_bytes
                          OR (v.video_etag IS NOT NULL AND v.video_etag IS DISTINCT FROM EXCLUDED.video_etag)
                        THEN NULL ELSE v.captioned_at END
WHERE (v.size_bytes, v.video_etag, v.video_modified)
      IS DISTINCT FROM (EXCLUDED.size_bytes, EXCLUDED.video_etag, EXCLUDED.video_modified);
