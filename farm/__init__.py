"""farm: a real-time speech farm for FreeSWITCH."""
