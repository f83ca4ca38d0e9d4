"""What an attack leaves: metrics and judging (`metrics`, `judge`), a sweep's durable store (`store`), its
summary and figures (`report`), and the figures of one attack (`plots`)."""
