"""Studies: rows as overlays on one base plan, trained per seed from the same stores, compared paired by seed."""
