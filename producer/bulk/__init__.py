"""Many rows as one job: ``chunks.py`` cuts rows into messages that fit the broker,
``batch.py`` publishes them and collects the results in input order."""
