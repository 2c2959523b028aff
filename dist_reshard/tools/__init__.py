"""What users run beside conversion: inspect, compare, verify, and the embedded demo."""
