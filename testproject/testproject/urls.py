"""URLs of the test project (see views)."""

from __future__ import annotations

from django.urls import path

from testproject import views

urlpatterns = [
    path("", views.index),
    path("set", views.set_values),
    path("get", views.get_all),
    path("incr", views.incr),
    path("ping", views.ping),
    path("aget", views.aget),
    path("logout", views.logout),
]
