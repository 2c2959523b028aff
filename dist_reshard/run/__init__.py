"""One rank's job: plan, the data loop (read, exchange, write per bucket), publishing through a staging folder."""
