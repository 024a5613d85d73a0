-- Record a video's basic info and the filter verdict.
UPDATE video_meta
SET num_frames = %(num_frames)s, fps = %(fps)s, height = %(height)s, width = %(width)s,
    filter_status = %(filter_status)s, filter_reason = %(filter_reason)s
WHERE partition_key = %(partition_key)s AND path = %(path)s;
