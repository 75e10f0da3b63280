//! The leak check every e2e test runs at its end (issue 20).
