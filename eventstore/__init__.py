"""The log: events, codec, append (dedup, expected seq), read, subscribe, retention."""
