"""Task logic of the video-curation DAG (scrape, filter, write-back, manifest). Imported at run time only."""
