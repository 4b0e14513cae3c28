from rest_framework.pagination import PageNumberPagination


class Pagination(PageNumberPagination):
    """Page numbers (the console shows them); ``page_size`` up to 1000 for scripts."""

    page_size_query_param = "page_size"
    max_page_size = 1000
