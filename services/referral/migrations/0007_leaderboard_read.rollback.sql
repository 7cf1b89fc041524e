DROP FUNCTION referral.leaderboard_top(text, integer);
