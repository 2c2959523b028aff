"""The package version, also recorded in every output's manifest."""

VERSION = "0.1.0"
