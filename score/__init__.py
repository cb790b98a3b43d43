"""``xr-score``: an archive scored in bulk on Ray Data (docs/operations.md, "Re-scoring an archive")."""
