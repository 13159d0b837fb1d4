"""Reports: matplotlib figures and one self-contained HTML page gathering them."""

from levyattn.report.html import Section, write_html_report

__all__ = ["Section", "write_html_report"]
