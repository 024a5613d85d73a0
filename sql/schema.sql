-- Metadata table of the video-curation DAG, LIST-partitioned by partition key (one partition per
-- scheduled/backfilled key, created on first registration). Apply with:
--     make db-init DB_URI=postgresql://user:pass@host:5432/db
-- Idempotent: safe to apply again.
CREATE TABLE IF NOT EXISTS video_meta (
    partition_key  text        NOT NULL,
    path           text        NOT NULL,
    registered_at  timestamptz NOT NULL DEFAULT now(),
    size_bytes     bigint,
    -- the object's identity as scrape last listed it: a change (replaced in place) re-queues the video
    video_etag     text,
    video_modified timestamptz,
    -- filter step: basic video info and the verdict
    num_frames     integer,
    fps            double precision,
    height         integer,
    width          integer,
    filter_status  text CHECK (filter_status IN ('kept', 'dropped', 'unreadable')),
    filter_reason  text,
    meta_uri       text,
    -- caption step
    text           text,
    caption_status text CHECK (caption_status IN ('ok', 'failed')),
    caption_error  text,
    caption_model  text,
    captioned_at   timestamptz,
    PRIMARY KEY (partition_key, path)
) PARTITION BY LIST (partition_key);

-- tables created before the identity columns existed
ALTER TABLE video_meta ADD COLUMN IF NOT EXISTS video_etag text;
ALTER TABLE video_meta ADD COLUMN IF NOT EXISTS video_modified timestamptz;

CREATE INDEX IF NOT EXISTS video_meta_caption_status ON video_meta (partition_key, caption_status);
