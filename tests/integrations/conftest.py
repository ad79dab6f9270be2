"""The framework integrations' tests: each module skips, naming the extra to install, only when
its framework is missing (CI installs every extra through ./scripts/test, so there they run)."""
