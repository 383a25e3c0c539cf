from genlab.report.html import write_report  # noqa: E402,F401  (genlab.report.write_report)
