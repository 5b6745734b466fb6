"""CAFE-aware sharding planner (installed as `cafe_planner`)."""
