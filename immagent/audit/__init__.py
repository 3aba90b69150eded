"""Audits over a store's backend: gc (reachability), verify (fsck) and bundles (export,
offline verification, import). Rules above the backend: they ask it for facts and decide.
Nothing here imports the store package, so the store can use them without a cycle."""
