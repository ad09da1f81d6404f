"""Test and development support: private servers, process helpers, the invariant checker."""
